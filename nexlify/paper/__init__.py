"""Paper trading's decision path: a trained model acting on live closed candles with simulated money.

- nexlify.paper.trader: one bar at a time, through the environment and the greedy policy that `nexlify
  evaluate` uses (nexlify.env.batched, nexlify.evaluation.greedy_policy);
- nexlify.paper.feed: closed candles from an exchange's public REST API through ccxt (no order path);
- nexlify.paper.settings: the service's settings (torch-free).
The service around it (the journal in a folder or S3, the output's lease, /metrics and /healthz) is the
controller's: controller.paper.
"""
