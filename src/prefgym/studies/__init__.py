"""Studies: experiments made of many runs of the pipeline's stages, each with its own report.

`prefgym study overoptimization`: gold, human and proxy reward against √KL for PPO at several KL
coefficients and for best-of-n, per source of feedback (Gao et al. 2022; AlpacaFarm Fig. 5).
`prefgym study feedback-budget`: win-rate against the number of preference labels.
"""
