"""Pure functions on tensors: no torch.library, no nn.Module."""
