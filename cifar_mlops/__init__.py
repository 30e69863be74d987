"""cifar-mlops: an experiment registry for CIFAR-10 ablation studies."""
