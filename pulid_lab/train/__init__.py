"""Training and measuring: profiles, the original model's and the adapter's trainers, pretraining, evaluation,
experiments, the Table 2 reproduction, model checks and benchmarks."""
