"""The CCF-LLM paper's tables as printed (Tables 2-4, Vicuna-7B), and the names its tables give the
methods, backbones, strategies and fusion ablations: the figures `ccfllm report` puts beside the measured
ones. Data only."""

BACKBONE_TITLES = {"mf": "MF", "lightgcn": "LightGCN", "sasrec": "SASRec"}
METHOD_TITLES = {"ccf-llm": "CCF-LLM", "collm": "CoLLM", "tallrec": "TallRec", "softprompt": "Softprompt"}

# The paper's Table 3 as printed (MovieLens-1M: AUC, RelaImpr; its CF and CoLLM rows are reproduced
# from CoLLM's paper).
PAPER_TABLE3 = {
    ("mf", "mf"): (0.6482, "-"),
    ("collm", "mf"): (0.7295, "54.86%"),
    ("ccf-llm", "mf"): (0.7315, "56.21%"),
    ("lightgcn", "lightgcn"): (0.5959, "-"),
    ("collm", "lightgcn"): (0.7100, "118.98%"),
    ("ccf-llm", "lightgcn"): (0.7427, "153.08%"),
    ("sasrec", "sasrec"): (0.7078, "-"),
    ("collm", "sasrec"): (0.7235, "7.56%"),
    ("ccf-llm", "sasrec"): (0.7526, "21.56%"),
    ("softprompt", "mf"): (0.7071, "-"),
    ("tallrec", "mf"): (0.7097, "1.25%"),
}
PAPER_BEST = {"collm": (0.7295, "10.82%"), "ccf-llm": (0.7526, "21.97%")}
# Table 4, on LightGCN.
PAPER_TABLE4 = {
    "default": (0.7427, "-"),
    "stage1-only": (0.7025, "-16.56%"),
    "end-to-end": (0.6390, "-42.73%"),
}
# Table 2, the Vicuna-7B column (AUC); the reference rows are Table 3's MF group.
PAPER_TABLE2 = {
    ("tallrec-cf", "zero-shot"): 0.6202,
    ("tallrec", "zero-shot"): 0.6184,
    ("tallrec-cf", "default"): 0.7108,
    ("tallrec", "default"): 0.7084,
}
TABLE2_ROWS = {
    ("tallrec-cf", "zero-shot"): "Zero-shot, w/ CF",
    ("tallrec", "zero-shot"): "Zero-shot, w/o CF",
    ("tallrec-cf", "default"): "Instruct-tuning, w/ CF",
    ("tallrec", "default"): "Instruct-tuning, w/o CF",
}
STRATEGY_TITLES = {"default": "Default", "stage1-only": "Stage 1 Only", "end-to-end": "End-to-end"}
TABLE4_BACKBONE = "lightgcn"
FUSION_VARIANTS = {"alpha-one": "α = 1", "alpha-scalar": "α ∈ R"}
