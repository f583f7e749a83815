"""FID and KID with a pluggable feature extractor (InceptionV3 or the offline digits net)."""

from keras_minsnr.metrics.evaluate import evaluate_samples
from keras_minsnr.metrics.evaluate import extract_features
from keras_minsnr.metrics.feature_extractors import FEATURE_EXTRACTORS
from keras_minsnr.metrics.feature_extractors import DigitsFeatureExtractor
from keras_minsnr.metrics.feature_extractors import FeatureExtractor
from keras_minsnr.metrics.feature_extractors import InceptionFeatureExtractor
from keras_minsnr.metrics.feature_extractors import build_digits_classifier
from keras_minsnr.metrics.feature_extractors import get_feature_extractor
from keras_minsnr.metrics.fid import FewSamplesWarning
from keras_minsnr.metrics.fid import compute_statistics
from keras_minsnr.metrics.fid import fid_from_features
from keras_minsnr.metrics.fid import frechet_distance
from keras_minsnr.metrics.kid import kid_from_features
from keras_minsnr.metrics.kid import mmd2_unbiased
from keras_minsnr.metrics.kid import polynomial_kernel
