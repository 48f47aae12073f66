"""Paper trading's service: the trained model on live closed candles with simulated money.

- controller.paper.cli: `nexlify paper`'s flags (torch-free, like the rest of the command line);
- controller.paper.service: the loop, the output's lease, JSON logs, Prometheus /metrics and /healthz; a process
  of its own that steps the model (torch), like `nexlify worker train`;
- controller.paper.journal: the append-only journal and the session header in the output (folder or S3);
- controller.paper.report: a session replayed for `nexlify report` (a torch child of the report).
The decision path itself is the trainer's: nexlify.paper.trader (the environment and greedy policy that
`nexlify evaluate` uses) and nexlify.paper.feed (closed candles through ccxt, no order path).
"""
