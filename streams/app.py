"""The faust-streaming application of a pymk worker: agents on the five input topics.

Thin glue: each agent takes raw messages, asks :mod:`pymk.validation` whether they are events, sends the
ones that are not to the dead-letter topic with the reason, and hands the valid ones to the processor.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

import faust
from pymk.streams.metrics import WorkerMetrics

from pymk.events import DeadLetter, InputEvent
from pymk.settings import INPUT_KINDS, Settings
from pymk.validation import Invalid, parse_event


def faust_credentials(settings: Settings) -> Any:
    """faust's credentials object for the security settings (None for PLAINTEXT)."""
    protocol = settings.security_protocol.upper()
    context = None
    if protocol.endswith("SSL"):
        context = ssl.create_default_context(cafile=settings.ssl_cafile or None)
        if settings.ssl_certfile:
            context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile or None)
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(username=settings.sasl_username, password=settings.sasl_password,
                                     mechanism=settings.sasl_mechanism or "PLAIN", ssl_context=context)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    if protocol != "PLAINTEXT":
        raise ValueError(f"unsupported security protocol {settings.security_protocol!r}")
    return None


class PymkApp:
    """Builds and holds the faust app, its topics and the worker's metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics()
        self.app = faust.App(
            settings.app_id,
            broker=f"kafka://{settings.bootstrap.replace(',', ';kafka://')}",
            broker_credentials=faust_credentials(settings),
            store="rocksdb://",
            datadir=str((settings.worker_dir / settings.app_id).resolve()),
            topic_partitions=settings.partitions,
            topic_replication_factor=settings.replication_factor,
            topic_allow_declare=True,
            consumer_auto_offset_reset="earliest",
            web_enabled=True,
            web_bind=settings.web_host,
            web_host=settings.web_host,
            web_port=settings.web_port,
            producer_max_request_size=4 * 1024 * 1024,
            broker_max_poll_records=2000,
            # Faust's default waits for the consumer group to settle for several seconds per rebalance.
            broker_rebalance_timeout=60,
            autodiscover=False,
        )
        self.input_topics = {
            kind: self.app.topic(settings.topic(kind), key_serializer="raw", value_serializer="raw",
                                 partitions=settings.partitions, internal=False)
            for kind in INPUT_KINDS
        }
        self.dead_letter_topic = self.app.topic(settings.topic("dead-letter"), key_serializer="raw",
                                                value_serializer="raw", partitions=settings.partitions)
        for kind, topic in self.input_topics.items():
            self.app.agent(topic, name=f"pymk.ingest.{kind}")(self._make_agent(kind))
        self._register_views()

    def _make_agent(self, kind: str) -> Any:
        settings, metrics, dead_letters, apply = self.settings, self.metrics, self.dead_letter_topic, self.apply

        async def ingest(stream: Any) -> Any:
            async for event in stream.events():
                started = time.perf_counter()
                message = event.message
                result = parse_event(kind, message.value, int(time.time() * 1000),
                                     max_bytes=settings.max_message_bytes, max_future_ms=settings.max_future_ms)
                if isinstance(result, Invalid):
                    letter = DeadLetter.for_message(message.topic, message.partition, message.offset,
                                                    result.reason, message.value, key=message.key,
                                                    limit=settings.max_message_bytes)
                    await dead_letters.send(key=message.key, value=letter.to_json())
                    metrics.observe(kind, False, time.perf_counter() - started, result.code)
                    continue
                await apply(result)
                metrics.observe(kind, True, time.perf_counter() - started)

        ingest.__name__ = f"ingest_{kind.replace('-', '_')}"
        return ingest

    async def apply(self, event: InputEvent) -> None:
        """Apply a valid event to the worker's state (the feature processor plugs in here)."""

    def _register_views(self) -> None:
        metrics = self.metrics

        @self.app.page("/health")
        async def health(web: Any, request: Any) -> Any:
            return web.json({"status": "ok", "app_id": self.settings.app_id,
                             "uptime_s": round(time.time() - metrics.started_at, 1)})

        @self.app.page("/metrics")
        async def metrics_view(web: Any, request: Any) -> Any:
            return web.text(metrics.render(), content_type="text/plain; version=0.0.4")

        @self.app.page("/stats")
        async def stats(web: Any, request: Any) -> Any:
            return web.json(metrics.snapshot())


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run one worker in the foreground until SIGINT/SIGTERM (``pymk worker``)."""
    from pymk.streams.topics import ensure_topics

    ensure_topics(settings)
    (settings.worker_dir / settings.app_id).mkdir(parents=True, exist_ok=True)
    pymk_app = PymkApp(settings)
    worker = faust.Worker(pymk_app.app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
