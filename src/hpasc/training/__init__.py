"""The pieces of the training loop (``hpasc.train`` puts them together).

- ``loop``: ``Trainer`` — the epochs, steps, validation, checkpoints and early stopping of one fold;
- ``distributed``: device choice, DDP set-up from the ``torchrun`` environment, rank helpers;
- ``sampling``: the resumable, seeded epoch sampler and per-item seeding of augmentations;
- ``state``: checkpoints (tensors and plain data only), RNG states, EMA, the LR schedule;
- ``fold_data``: a config + fold -> training and validation cells (folds, masks, cell cache);
- ``validation``: predicting the validation cells and scoring them; ``logs``: log.csv and curves.png.
"""
