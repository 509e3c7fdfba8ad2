"""pymk: streaming People-You-May-Know."""
