"""fastrnn: drop-in torch.nn RNN, LSTM, GRU and cells whose time loop runs in fused Triton kernels
on CUDA and compiled Numba loops on the CPU.

>>> import fastrnn
>>> lstm = fastrnn.LSTM(10, 20, num_layers=2)      # same arguments as torch.nn.LSTM
>>> lstm.backend_for(None).name                    # which backend runs it, and why (.reason)
"""
from fastrnn import backends, cells, functional
from fastrnn.autograd import Recurrence
from fastrnn.backends import BackendUnavailable, Choice
from fastrnn.convert import convert
from fastrnn.kernels import reference
from fastrnn.modules import GRU, LSTM, RNN, GRUCell, LSTMCell, PeepholeLSTM, RNNCell

__version__ = "0.1.0"
__all__ = ["RNN", "LSTM", "GRU", "PeepholeLSTM", "RNNCell", "LSTMCell", "GRUCell", "Recurrence", "Choice",
           "BackendUnavailable", "convert", "backends", "cells", "functional", "reference"]
