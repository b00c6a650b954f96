"""distributed_asac: bias mitigation with Attribute-Specific Adversarial Counterfactuals (ASACs)."""

__version__ = "0.1.0"
