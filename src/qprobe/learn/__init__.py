"""Training loops that change the policy: REINFORCE with a choice of reward, iterative Q-probing.

`reinforce` holds the equations (Q-RM's token rewards, the loss), `policy` the LoRA policy and its
samplers, `rewards` the reward sources (oracle, ORM, Q-RM, Q-probe value), `rl` the resumable
REINFORCE loop, `iterate` iterative Q-probing (collect, pick, fine-tune, retrain the probe).
Importing this package imports neither torch nor transformers.
"""
