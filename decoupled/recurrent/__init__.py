"""Recurrent DNI: synthetic gradients across truncated-BPTT boundaries (Jaderberg et al. 2016,
section 3.1).

An LSTM core is unrolled over a sequence in segments of T steps. At the end of each segment a
synthesizer predicts the gradient of all future losses with respect to the recurrent state, so the
core learns from dependencies longer than T. Ray-free: the whole algorithm runs in one process.
"""
