"""Reference trainer: the recipe of TensorFlow's image-classification tutorial.

The recipe, from tensorflow.org/tutorials/images/classification, loads the
class folders with `keras.utils.image_dataset_from_directory` and an 80/20
split, then applies `cache()`, `shuffle(1000)` and `prefetch(AUTOTUNE)`. It
fits a CNN of three Conv2D blocks (16, 32 and 64 filters, 3x3, ReLU, 2x2 max
pooling), a Dense layer of 128 units and a logits layer. The optimizer is
Adam and the loss is from-logits sparse categorical cross-entropy.

Run it as `python -m bench.reference DATA_DIR --epochs 10`. It prints one JSON
object on stdout, and writes it to --output if given: wall seconds, final val
accuracy, per-epoch seconds and the image counts.
"""

from __future__ import annotations

import argparse
import json
import time

STARTED = time.perf_counter()


def build_model(image_size: tuple[int, int], num_classes: int):
    """Build the tutorial's three-block CNN for RGB images of `image_size`."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(shape=(*image_size, 3)),
            layers.Rescaling(1.0 / 255),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(num_classes),
        ]
    )


def epoch_timer(end_times: list[float]):
    """Return a callback that appends perf_counter() at the end of each epoch.

    Keras calls on_epoch_end after the validation pass, as the pipeline's
    MLflow logger is called, so intervals between these times cover the same
    work in both.
    """
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            end_times.append(time.perf_counter())

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            end_times.append(time.perf_counter())

    return EpochTimer()


def train_reference(
    data_dir: str,
    image_size: tuple[int, int] = (128, 128),
    epochs: int = 10,
    learning_rate: float = 0.001,
    batch_size: int = 32,
    seed: int = 123,
) -> dict:
    """Load, train and validate as the tutorial does; return timings and accuracy."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    train_ds, val_ds = keras.utils.image_dataset_from_directory(
        data_dir,
        validation_split=0.2,
        subset="both",
        seed=seed,
        image_size=image_size,
        batch_size=batch_size,
    )
    num_train, num_val = len(train_ds.file_paths), len(val_ds.file_paths)
    num_classes = len(train_ds.class_names)
    train_ds = train_ds.cache().shuffle(1000).prefetch(buffer_size=tf.data.AUTOTUNE)
    val_ds = val_ds.cache().prefetch(buffer_size=tf.data.AUTOTUNE)

    model = build_model(image_size, num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    end_times: list[float] = []
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        callbacks=[epoch_timer(end_times)],
        verbose=2,
    )

    epoch_seconds = [b - a for a, b in zip(end_times, end_times[1:], strict=False)]
    return {
        "wall_seconds": time.perf_counter() - STARTED,
        "val_accuracy": float(history.history["val_accuracy"][-1]),
        "epoch_seconds": epoch_seconds,
        "num_train": num_train,
        "num_val": num_val,
        "num_classes": num_classes,
        "learning_rate": learning_rate,
        "tensorflow_version": tf.__version__,
    }


def main() -> None:
    """Parse the arguments, train, and print the result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", help="folder with one sub-folder per class")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=(128, 128),
        metavar=("HEIGHT", "WIDTH"),
        help="size in pixels that every image is resized to",
    )
    parser.add_argument("--learning-rate", type=float, default=0.001, help="Adam's")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step")
    parser.add_argument("--seed", type=int, default=123, help="split and init seed")
    parser.add_argument("--output", help="also write the JSON result to this file")
    args = parser.parse_args()
    result = train_reference(
        args.data_dir,
        tuple(args.image_size),
        args.epochs,
        args.learning_rate,
        args.batch_size,
        args.seed,
    )
    print(json.dumps(result))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            json.dump(result, file)


if __name__ == "__main__":
    main()
