"""Routing math and the slow reference MoE forward. Dimension legend: T tokens, E experts, K selected, H hidden,
I intermediate, L layers."""
