"""SMI pretraining and evaluation (needs the ``train`` extra: ``pip install -e ".[train]"``)."""
