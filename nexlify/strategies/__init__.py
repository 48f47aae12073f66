"""Strategies beyond spot, as pure vectorised tensor arithmetic for the batched environment.

- `staking`: rewards compounding on staked coins and a one-lot unbonding queue per (episode, pair).
- `uniswap_v3`: concentrated-liquidity amounts, value, fees and impermanent loss (V3 whitepaper).
- `aave`: Aave V3 interest rate strategy and per-bar supply interest, with a utilization path.
- `arbitrage`: cross-exchange spread, net edge after fees and transfer costs, and fills from inventory.

Each module's docstring states its model and assumptions; each params dataclass cites its sources.
"""
