"""A covariance-reset layer whose reset variance c is learned per token: a gated, normalized
delta rule.

The reset filter replaces the predicted covariance by c_t I before every update, so the
update is the delta rule with gain c_t / (c_t |k_t|^2 + r_t):

    S_t = alpha_t S_{t-1} + c_t k_t (v_t - alpha_t S_{t-1}^T k_t)^T / (c_t |k_t|^2 + r_t)

Why want it: the keys need not be unit vectors. The gain divides by the key's squared norm,
so a long key cannot overshoot (the gain times |k|^2 stays below 1 for any key, the
normalized LMS step), and the model has two knobs per token: c_t, how much it trusts its
memory to be wrong (a large c_t is a fresh prior: write hard), and r_t, how noisy the value
is. With unit keys the gain would be c/(c + r) = sigmoid(log c - log r) and the two knobs
would collapse into Gated DeltaNet's beta; here |k_t| takes part.

Inputs: a per-token log-decay g, a per-token reset variance c > 0, a per-token observation
noise r > 0.
"""
from designmodel.spec import *

g = Input("g", domain="logdecay")          # log-decay per token and head
c = Input("c", domain="positive")          # reset (prior) variance per token: learned
r = Input("r", domain="positive")          # observation noise variance per token

model = DesignModel(
    name="reset_learned_prior",
    transition=Transition(decay=exp(g)),
    observation=Regression(noise=r),
    filter=reset(c),
    description="covariance reset with a learned per-token prior variance c, keys of any norm",
)
