"""The transfer-learning library behind the DVC stages: one subpackage per params.yaml section (data, backbone,
features for `extract`, heads, advise, finetune, evaluate, deploy for predict), `common` for what they all share,
and `params.py`, where all of params.yaml is validated. Package __init__ files import nothing: a stage pays only
for the modules it uses."""
