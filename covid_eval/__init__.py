"""Evaluation and explanation: calibration, acquisition shifts, the leaderboard, external sets, Grad-CAM.

Everything here reads stored models (``covid_models.stored.StoredModel``) and data; nothing here
promotes, publishes or exports. The registry (``covid_registry``) builds on it.
"""
