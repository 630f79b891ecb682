"""Metrics (PSNR, SSIM, landmark distance, mouth-audio sync) and evaluation of avatars."""
