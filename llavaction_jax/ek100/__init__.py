"""EPIC-KITCHENS-100: annotations and label maps (labels.py), LLaVAction's prompts (prompts.py), the EK100-MQA
question files of ``build-mqa`` (mqa.py, build_mqa.py) with prior actions at test time (prior_actions.py), the
training files of ``build-train`` (train_files.py, build_train.py) and the training prompts built when a sample is
loaded (train_prompt.py). The generic data pipeline (``data/``)
knows nothing of EK100; ``train`` hands it ``train_prompt.EK100PromptSettings``."""
