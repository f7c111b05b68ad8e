"""Online RL on the sampler's own trajectories (GRPO): the stochastic reverse steps and their densities
(``sdpo.rl.sde``), the objective (``sdpo.rl.grpo``), the rollout that records trajectories
(``sdpo.rl.rollout``) and the trajectory dataset the trainer steps on (``sdpo.rl.trajectories``)."""
