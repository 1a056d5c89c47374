"""Text to training batches: sources, the bilingual tokenizer, corpora, span sampling, the GLM / MLM /
CLM objectives, packing and the resumable batch iterator.

Imports only `glmkit.errors` and `glmkit.batch`; knows nothing of models, files of runs or the command line.
"""
