"""The corruption families behind `mnist-c:SPLIT/NAME` specs: MNIST-C's (mnist_c), those beyond it
(beyond_mnist_c) and the pixel operations they share (image_ops); retrieval.data.corrupt registers them."""
