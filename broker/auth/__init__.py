"""Who is calling (principals from tokens and client certificates) and what they may do (a
policy file granting roles on queue patterns)."""
