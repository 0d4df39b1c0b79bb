"""Where each tensor lives: the memory plan, block swap, lean layers and the hooks that install them."""
