"""The stock callbacks that come with fsm_learner, one module each."""

__all__: list[str] = []
