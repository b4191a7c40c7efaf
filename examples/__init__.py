"""The blog post's scenario (emails and image processing), written for taskbroker."""
