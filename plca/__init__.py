"""plca: domain adaptive semantic segmentation with Pixel-Level Cycle Association."""
