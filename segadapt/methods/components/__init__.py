"""Adaptation parts that methods compose, each written once with its own typed config section:

* ``teacher``          -- mean teacher (EMA of the student) and its pseudo-labels   ``method.teacher``
* ``augment``          -- DACS's photometric augmentation (colour jitter, blur)   ``method.augment``
* ``classmix``         -- ClassMix of source classes onto the target              ``method.mix``
* ``rcs``              -- rare class sampling of the source stream                ``method.rcs``
* ``feature_distance`` -- ImageNet feature distance (DAFormer)                    ``method.fd``
* ``mic``              -- masked image consistency (MIC), on every method         ``method.mic``
* ``style``            -- online AdaIN restyling of batches                       ``method.style``
* ``cut``              -- CUT style transfer, trained by its own losses           ``method.cut``

A component is a plain object or an ``nn.Module`` (when it holds state that checkpoints must
keep: a teacher, a frozen backbone); its config dataclass checks its own values when the config
loads. Components never import methods.
"""
