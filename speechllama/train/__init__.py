"""Training: ``speechllama train`` and its pieces.

- ``config``: the frozen ``TrainConfig`` of a run;
- ``build``: tokenizer and model a run starts from, provenance;
- ``setup``: manifests -> datasets, the encoder cache, dev batches;
- ``data``: examples and padded batches; ``cache``: frozen-encoder outputs on disk;
- ``freeze``: frozen parts, head 1 kept fixed in heads-only training, the run's plan;
- ``hidden``: heads-only training on the frozen trunk's cached final hidden states;
- ``step``: one teacher-forced pass and its losses; ``losses``: K-head CE, CTC, head accuracy;
- ``schedule``: warmup + cosine; ``validate``: dev loss, per-head accuracy and greedy WER;
- ``metrics``: the metrics.jsonl log and the dev summary line;
- ``loop``: ``train(TrainConfig) -> TrainResult``, checkpoints and resumption.
"""
