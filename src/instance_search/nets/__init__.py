"""Networks (torch ``nn.Module`` only): the learned R-MAC head, the region proposal network, the detector."""
