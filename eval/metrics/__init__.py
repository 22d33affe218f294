"""The numbers the evaluation commands report: IoU of activation maps against grounded masks (ours and
the paper's pixel method), ground truth of planted concepts, latent separation (AUROC), singular
values, explanation scoring, and the statistics behind the intervals."""
