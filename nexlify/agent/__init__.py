from nexlify.agent.dqn import DQNAgent, DuelingQNet

__all__ = ["DQNAgent", "DuelingQNet"]
