# How a backbone's tokens become one feature vector: the CLS token, the mean patch token, or both concatenated
# [cls ‖ avg]. The names in a feature cache's meta, `ssl-vit features --pooling` and the linear probe's grid.
POOLINGS = ("cls", "avg", "cls+avg")
# `auto`: cls where the model has a CLS token, avg where it has none (a Swin); a cache records what it chose.
AUTO_POOLING = "auto"
