"""Training: triplet ranking loss (Gordo et al. 2016), the RPN, the CS-SR detector, training-set cleaning."""
