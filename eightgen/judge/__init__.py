"""Judging optimised images: independent referees, their real-image check, Fréchet distance, the three-ways verdicts."""
