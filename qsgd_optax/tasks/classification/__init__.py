"""Transformer text classification (the paper's first experiment), split by job.

* :mod:`~qsgd_optax.tasks.classification.experiment`: the configuration,
  the jitted train and eval steps, the train loop with checkpoints, and the
  comparison table;
* :mod:`~qsgd_optax.tasks.classification.transformer`: the classifier model
  (NNX);
* :mod:`~qsgd_optax.tasks.classification.quantum_attention`: standard and
  quantum self-attention;
* :mod:`~qsgd_optax.tasks.classification.text_data`: the synthetic order
  task and the sentence-polarity data set.

Import the submodules directly
(``from qsgd_optax.tasks.classification import experiment``).
"""
