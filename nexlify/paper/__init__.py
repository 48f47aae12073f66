"""Paper trading: a trained model acting on live closed candles with simulated money.

- nexlify.paper.trader: the decision path, one bar at a time, through the environment and the greedy policy
  that `nexlify evaluate` uses (nexlify.env.batched, nexlify.evaluation.greedy_policy);
- nexlify.paper.feed: closed candles from an exchange's public REST API through ccxt (no order path);
- nexlify.paper.journal: the append-only journal and the session header in the output (folder or S3);
- nexlify.paper.service: the loop, the lease, JSON logs, Prometheus /metrics and /healthz.
"""
