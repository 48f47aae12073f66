from torch import nn

from nexlify.agent.dqn import DQNAgent, DuelingQNet
from nexlify.agent.forecast import ForecastAgent, ForecastNet
from nexlify.config import AgentConfig, RiskConfig
from nexlify.env.layout import N_ACTIONS, observation_size
from nexlify.errors import InputError

__all__ = ["DQNAgent", "DuelingQNet", "ForecastAgent", "ForecastNet", "build_model", "forecast_units"]


def forecast_units(agent_cfg: AgentConfig, risk_cfg: RiskConfig) -> float:
    """The forecast's units: a log return times this is percent of equity at the size a trade opens with (the
    fixed size, capped by the per-trade cap), the learner's reward units at reward_scale 100."""
    return agent_cfg.reward_scale * min(risk_cfg.fixed_size, risk_cfg.max_position)


def build_model(agent_cfg: AgentConfig, n_features: int, weights: dict | None = None) -> nn.Module:
    """The policy network of `agent_cfg.algorithm` for `n_features` market features (evaluate, the report,
    paper trading), with `weights` (a checkpoint's model_state_dict) loaded when given: InputError when they
    do not fit that network."""
    if agent_cfg.algorithm == "forecast":
        model: nn.Module = ForecastNet(n_features, agent_cfg.hidden, agent_cfg.forecast_members)
    else:
        model = DuelingQNet(observation_size(n_features), N_ACTIONS, agent_cfg.hidden)
    if weights is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError:
            n = agent_cfg.forecast_members
            members = f" ({n} member{'s' if n > 1 else ''})" if agent_cfg.algorithm == "forecast" else ""
            raise InputError(f"the checkpoint's weights do not fit a {agent_cfg.algorithm} network{members} of "
                             f"{agent_cfg.hidden} hidden units on {n_features} features; accepted: a checkpoint whose "
                             "config names the learner and the size it was trained with") from None
    return model
