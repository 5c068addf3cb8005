"""Audio in and out: reading, writing and resampling files (`io`), walking and pairing folder
trees and converting them file by file (`folders`), the preceding speech enhancers that make a
processed folder from a noisy one (`enhancers`), and noisy mixtures for demos (`mixing`)."""
