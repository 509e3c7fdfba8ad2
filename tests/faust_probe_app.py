"""A minimal faust app with a RocksDB table and a repartition (group_by), run by test_faust_topics.py."""

import os

import faust

app = faust.App(
    os.environ["PROBE_APP_ID"],
    broker=f"kafka://{os.environ['PROBE_BOOTSTRAP']}",
    store="rocksdb://",
    datadir=os.environ["PROBE_DATADIR"],
    topic_partitions=4,
    web_port=int(os.environ["PROBE_WEB_PORT"]),
    web_bind="127.0.0.1",
    consumer_auto_offset_reset="earliest",
)


class Visit(faust.Record, serializer="json"):
    user: str
    page: str


visits = app.topic(os.environ["PROBE_TOPIC"], value_type=Visit, partitions=4)
per_page = app.Table("per_page", default=int, partitions=4, help="visits per page")


@app.agent(visits)
async def count(stream):  # noqa: ANN001, ANN201
    async for visit in stream.group_by(Visit.page, name="by_page"):
        per_page[visit.page] += 1
