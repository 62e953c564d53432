"""fedbucket-textclf: a fedbucket task package that classifies chat messages as offensive or not
with a hashed n-gram EmbeddingBag model. A federation names it ``fedbucket_textclf.task:TASK``.

Modules: :mod:`.tokenizer` (stable hashed n-grams), :mod:`.model` (``NgramClassifier``),
:mod:`.data` (CSV reader, synthetic corpus), :mod:`.task` (the ``TASK``), :mod:`.central` (the
centrally trained baseline). Importing the package itself imports neither torch nor fedbucket.
"""

__version__ = "0.1.0"
