"""Analysis of steering sweeps: preference/utility log-odds and the paper's validity-decay fit."""
