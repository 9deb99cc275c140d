"""Bonsai: priors, sampled sub-model masks, the regression over their losses, and the rounds."""
