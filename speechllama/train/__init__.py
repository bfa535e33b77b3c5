"""Training: ``speechllama train`` and its pieces.

- ``config``: the frozen ``TrainConfig`` of a run;
- ``build``: tokenizer and model a run starts from, provenance;
- ``setup``: manifests -> datasets, the encoder cache, dev batches;
- ``data``: examples and padded batches; ``cache``: frozen-encoder outputs on disk;
- ``step``: one teacher-forced pass and its losses; ``losses``: K-head CE and CTC;
- ``schedule``: warmup + cosine; ``validate``: dev loss and greedy WER;
- ``loop``: ``train(TrainConfig) -> TrainResult``, checkpoints and resumption.
"""
