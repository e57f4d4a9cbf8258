"""FlowerTune code challenge: HumanEval, MBPP and MultiPL-E (JavaScript, C++) pass@1."""
