"""2D face perception from offline models: detection, 478-point landmarks, person
segmentation (mediapipe's bundled models), and the masks and signals derived from them."""
