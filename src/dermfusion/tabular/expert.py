"""TabularExpert: a multiclass gradient-boosted model (LightGBM or XGBoost), scikit-learn style.

    expert = TabularExpert(backend="lightgbm", params={"learning_rate": 0.03}, class_weight="sqrt")
    expert.fit(X_df, y_idx)                # early-stops on an inner stratified split, then refits
    p = expert.predict_proba(X_df)         # N x C, rows sum to 1
    expert.save(dir); TabularExpert.load(dir)

Saved in the library's own format (`model.txt` for LightGBM, `model.json` for XGBoost) next to
`expert.json` (backend, classes, feature columns, categorical vocabularies), never pickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DermfusionError

BACKENDS = ("lightgbm", "xgboost", "logreg")
MODEL_FILES = {"lightgbm": "model.txt", "xgboost": "model.json", "logreg": "model.json"}
META_FILE = "expert.json"

DEFAULT_PARAMS = {
    "lightgbm": {"learning_rate": 0.03, "num_leaves": 15, "min_child_samples": 20, "feature_fraction": 0.7,
                 "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0, "max_bin": 255,
                 "n_estimators": 2000},
    "xgboost": {"learning_rate": 0.03, "max_depth": 4, "min_child_weight": 2.0, "subsample": 0.8,
                "colsample_bytree": 0.7, "reg_lambda": 1.0, "n_estimators": 2000},
    # a smooth, strongly regularised linear model: on 4k lesions it is as good as the trees and
    # errs differently, which is what an ensemble needs
    "logreg": {"C": 0.05, "max_iter": 3000},
}


class LinearModel:
    """Multinomial logistic regression with its own preprocessing, stored as plain JSON.

    Numeric columns: median-imputed + a missing indicator (where training had missing values),
    standardised. Categorical columns: one-hot over the fixed vocabulary (+ unknown).
    """

    def __init__(self, state: dict | None = None):
        self.state = state or {}

    def _design(self, X: pd.DataFrame) -> np.ndarray:
        st = self.state
        parts = []
        for c in st["numeric"]:
            v = pd.to_numeric(X[c], errors="coerce").to_numpy(float)
            miss = np.isnan(v)
            parts.append(np.where(miss, st["median"][c], v))
            if c in st["indicator"]:
                parts.append(miss.astype(float))
        for c, cats in st["categorical"].items():
            v = X[c].astype(object).to_numpy()
            for cat in cats:
                parts.append((v == cat).astype(float))
            parts.append(pd.isna(X[c]).to_numpy().astype(float))
        Z = np.stack(parts, axis=1) if parts else np.zeros((len(X), 0))
        return (Z - np.asarray(st["mean"])) / np.asarray(st["scale"])

    def fit(self, X: pd.DataFrame, y: np.ndarray, w: np.ndarray, num_classes: int, params: dict, seed: int):
        from sklearn.linear_model import LogisticRegression

        cat = {c: list(X[c].cat.categories) for c in X.columns if isinstance(X[c].dtype, pd.CategoricalDtype)}
        num = [c for c in X.columns if c not in cat]
        med = {c: float(np.nanmedian(X[c].to_numpy(float))) if X[c].notna().any() else 0.0 for c in num}
        ind = [c for c in num if X[c].isna().any()]
        self.state = {"numeric": num, "median": med, "indicator": ind, "categorical": cat,
                      "mean": 0.0, "scale": 1.0}
        Z = self._design(X)
        mean, scale = Z.mean(0), Z.std(0)
        scale[scale < 1e-8] = 1.0
        self.state.update(mean=mean.tolist(), scale=scale.tolist())
        Z = (Z - mean) / scale
        p = {k: v for k, v in params.items() if k in {"C", "max_iter", "tol"}}
        lr = LogisticRegression(**{"C": 0.05, "max_iter": 3000, **p}, random_state=seed)
        lr.fit(Z, y, sample_weight=w)
        coef = np.zeros((num_classes, Z.shape[1]))
        icpt = np.full(num_classes, -30.0)  # classes absent from training get ~zero probability
        coef[lr.classes_] = lr.coef_ if len(lr.classes_) > 2 else np.r_[-lr.coef_, lr.coef_] / 2
        icpt[lr.classes_] = lr.intercept_ if len(lr.classes_) > 2 else np.r_[-lr.intercept_, lr.intercept_] / 2
        self.state.update(coef=coef.tolist(), intercept=icpt.tolist())
        return self

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        z = self._design(X) @ np.asarray(self.state["coef"]).T + np.asarray(self.state["intercept"])
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)


class ExpertError(DermfusionError, ValueError):
    """Invalid input to the tabular expert; the message says what to do."""


def class_weights(y: np.ndarray, num_classes: int, mode: str | None) -> np.ndarray:
    """Per-sample weights: None -> 1, "balanced" -> n/(C·n_c), "sqrt" -> sqrt of balanced (milder).

    Weights are normalised to mean 1 so that learning-rate / min_child settings keep their meaning.
    """
    if mode in (None, "none"):
        return np.ones(len(y))
    counts = np.bincount(y, minlength=num_classes).astype(float)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    if mode == "sqrt":
        w = np.sqrt(w)
    elif mode != "balanced":
        raise ExpertError(f"class_weight must be None, 'balanced' or 'sqrt', got {mode!r}")
    sw = w[y]
    return sw / sw.mean()


class TabularExpert:
    def __init__(self, backend: str = "lightgbm", params: dict | None = None, *, num_classes: int | None = None,
                 class_weight: str | None = None, early_stopping_rounds: int | None = 100,
                 validation_fraction: float = 0.15, refit_full: bool = True, random_state: int = 0,
                 n_jobs: int = 2):
        if backend not in BACKENDS:
            raise ExpertError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "xgboost":
            try:
                import xgboost  # noqa: F401
            except ImportError:
                raise ExpertError("backend 'xgboost' needs the xgboost package: pip install 'dermfusion[xgboost]'") \
                    from None
        if not 0.0 < validation_fraction < 0.5:
            raise ExpertError(f"validation_fraction must be in (0, 0.5), got {validation_fraction}")
        self.backend = backend
        self.params = dict(params or {})
        self.num_classes = num_classes
        self.class_weight = class_weight
        self.early_stopping_rounds = early_stopping_rounds
        self.validation_fraction = validation_fraction
        self.refit_full = refit_full
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.model_ = None
        self.feature_columns_: list[str] = []
        self.categorical_: dict[str, list] = {}
        self.best_iteration_: int | None = None

    # ------------------------------------------------------------------ validation
    def _check_X(self, X, fitting: bool) -> pd.DataFrame:
        if not isinstance(X, pd.DataFrame):
            raise ExpertError(f"X must be a pandas DataFrame of features (see tabular.features.build_features), "
                              f"got {type(X).__name__}")
        if fitting:
            if len(X) == 0:
                raise ExpertError("cannot fit on an empty feature table")
            return X
        if self.model_ is None:
            raise ExpertError("this TabularExpert is not fitted yet; call fit(X, y) or TabularExpert.load(dir)")
        missing = [c for c in self.feature_columns_ if c not in X.columns]
        if missing:
            raise ExpertError(f"X lacks {len(missing)} feature column(s) seen at fit time, e.g. {missing[:5]}; "
                              "build features with the same TabularFeatureSpec as training")
        X = X[self.feature_columns_].copy()
        for col, cats in self.categorical_.items():
            X[col] = pd.Categorical(X[col].astype(object).where(X[col].notna()), categories=cats)
        return X

    def _check_y(self, y, n: int) -> np.ndarray:
        y = np.asarray(y)
        if y.ndim == 2:  # one-hot / probabilities -> index
            y = y.argmax(axis=1)
        if y.ndim != 1 or len(y) != n:
            raise ExpertError(f"y must be a 1-D array of class indices with one entry per row of X ({n}), "
                              f"got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            if not np.all(np.equal(np.mod(y, 1), 0)):
                raise ExpertError("y must hold integer class indices (0..C-1); map class names with "
                                  "task.index(name) first")
            y = y.astype(int)
        if y.min() < 0:
            raise ExpertError("y holds negative class indices; unlabelled rows must be dropped before fit")
        if self.num_classes is not None and y.max() >= self.num_classes:
            raise ExpertError(f"y holds class index {y.max()} but num_classes={self.num_classes}")
        return y

    # ------------------------------------------------------------------ fit / predict
    def _inner_split(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.model_selection import StratifiedShuffleSplit

        counts = np.bincount(y)
        strat = np.where(counts[y] >= 2, y, counts.argmax())  # singletons cannot be stratified; pool them
        sss = StratifiedShuffleSplit(n_splits=1, test_size=self.validation_fraction, random_state=self.random_state)
        try:
            return next(sss.split(np.zeros(len(y)), strat))
        except ValueError:
            rng = np.random.default_rng(self.random_state)
            perm = rng.permutation(len(y))
            k = max(1, int(len(y) * self.validation_fraction))
            return np.sort(perm[k:]), np.sort(perm[:k])

    def fit(self, X: pd.DataFrame, y, sample_weight=None, eval_set=None) -> "TabularExpert":
        """Fit on features X (DataFrame) and class indices y.

        eval_set: optional (X_val, y_val) for early stopping; otherwise an inner stratified split of
        `validation_fraction` is held out, the best round count found, and (refit_full) the model is
        refitted on all rows for that many rounds scaled by 1/(1-validation_fraction).
        """
        X = self._check_X(X, fitting=True)
        y = self._check_y(y, len(X))
        C = self.num_classes or int(y.max()) + 1
        self.num_classes = C
        self.feature_columns_ = list(X.columns)
        self.categorical_ = {c: list(X[c].cat.categories) for c in X.columns
                             if isinstance(X[c].dtype, pd.CategoricalDtype)}
        w = class_weights(y, C, self.class_weight)
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight, float)
            if sample_weight.shape != (len(X),) or (sample_weight < 0).any():
                raise ExpertError("sample_weight must be non-negative with one entry per row of X")
            w = w * sample_weight
        params = {**DEFAULT_PARAMS[self.backend], **self.params}
        if self.backend == "logreg":
            self.model_ = LinearModel().fit(X, y, w, C, params, self.random_state)
            self.best_iteration_ = None
            return self
        n_rounds = int(params.pop("n_estimators", 1000))
        if eval_set is not None:
            Xv = self._check_X(eval_set[0], fitting=True)[self.feature_columns_]
            yv = self._check_y(eval_set[1], len(Xv))
            self._fit_backend(X, y, w, params, n_rounds, (Xv, yv))
            return self
        if self.early_stopping_rounds:
            tr, va = self._inner_split(y)
            self._fit_backend(X.iloc[tr], y[tr], w[tr], params, n_rounds, (X.iloc[va], y[va]))
            if self.refit_full:
                rounds = max(1, int(round(self.best_iteration_ / (1.0 - self.validation_fraction))))
                self._fit_backend(X, y, w, params, rounds, None)
                self.best_iteration_ = rounds
            return self
        self._fit_backend(X, y, w, params, n_rounds, None)
        return self

    def _fit_backend(self, X, y, w, params, n_rounds, valid):
        if self.backend == "lightgbm":
            import lightgbm as lgb

            p = {"objective": "multiclass", "num_class": self.num_classes, "verbosity": -1,
                 "num_threads": self.n_jobs, "seed": self.random_state, "deterministic": True,
                 "force_row_wise": True, **params}
            dtrain = lgb.Dataset(X, label=y, weight=w, categorical_feature=list(self.categorical_) or "auto",
                                 free_raw_data=False)
            kw = {}
            if valid is not None:
                dval = lgb.Dataset(valid[0], label=valid[1], reference=dtrain)
                kw = {"valid_sets": [dval], "callbacks": [lgb.early_stopping(self.early_stopping_rounds or 100,
                                                                             verbose=False)]}
            self.model_ = lgb.train(p, dtrain, num_boost_round=n_rounds, **kw)
            self.best_iteration_ = self.model_.best_iteration or n_rounds
        else:
            import xgboost as xgb

            p = {"objective": "multi:softprob", "num_class": self.num_classes, "tree_method": "hist",
                 "nthread": self.n_jobs, "seed": self.random_state, "eval_metric": "mlogloss",
                 "max_cat_to_onehot": 1, **params}
            dtrain = xgb.DMatrix(X, label=y, weight=w, enable_categorical=True)
            kw = {}
            if valid is not None:
                dval = xgb.DMatrix(valid[0], label=valid[1], enable_categorical=True)
                kw = {"evals": [(dval, "valid")], "early_stopping_rounds": self.early_stopping_rounds or 100,
                      "verbose_eval": False}
            self.model_ = xgb.train(p, dtrain, num_boost_round=n_rounds, **kw)
            best = getattr(self.model_, "best_iteration", None)
            self.best_iteration_ = (best + 1) if (valid is not None and best is not None) else n_rounds
            if valid is not None:  # keep only the best rounds so predict needs no iteration_range
                self.model_ = self.model_[: self.best_iteration_]
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        X = self._check_X(X, fitting=False)
        if self.backend == "lightgbm":
            p = self.model_.predict(X, num_iteration=self.model_.best_iteration or None)
        elif self.backend == "logreg":
            p = self.model_.predict(X)
        else:
            import xgboost as xgb

            p = self.model_.predict(xgb.DMatrix(X, enable_categorical=True))
        p = np.asarray(p, dtype=np.float64).reshape(len(X), self.num_classes)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)

    def feature_importance(self) -> pd.Series:
        """Total gain per feature (for reports)."""
        if self.model_ is None:
            raise ExpertError("not fitted")
        if self.backend == "logreg":
            raise ExpertError("feature_importance is only defined for tree backends")
        if self.backend == "lightgbm":
            vals = self.model_.feature_importance(importance_type="gain")
            return pd.Series(vals, index=self.feature_columns_).sort_values(ascending=False)
        score = self.model_.get_score(importance_type="total_gain")
        return pd.Series({c: score.get(c, 0.0) for c in self.feature_columns_}).sort_values(ascending=False)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        if self.model_ is None:
            raise ExpertError("cannot save an unfitted TabularExpert")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        model_file = d / MODEL_FILES[self.backend]
        if self.backend == "lightgbm":
            self.model_.save_model(str(model_file), num_iteration=self.model_.best_iteration or None)
        elif self.backend == "logreg":
            model_file.write_text(json.dumps(self.model_.state))
        else:
            self.model_.save_model(str(model_file))
        meta = {"backend": self.backend, "params": self.params, "num_classes": self.num_classes,
                "class_weight": self.class_weight, "feature_columns": self.feature_columns_,
                "categorical": self.categorical_, "best_iteration": self.best_iteration_,
                "random_state": self.random_state, "model_file": model_file.name}
        (d / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        return model_file

    @classmethod
    def load(cls, directory: str | Path, n_jobs: int = 2) -> "TabularExpert":
        d = Path(directory)
        if not (d / META_FILE).exists():
            raise ExpertError(f"{d} holds no {META_FILE}; save an expert with TabularExpert.save(dir) first")
        meta = json.loads((d / META_FILE).read_text())
        self = cls(backend=meta["backend"], params=meta["params"], num_classes=meta["num_classes"],
                   class_weight=meta.get("class_weight"), random_state=meta.get("random_state", 0), n_jobs=n_jobs)
        self.feature_columns_ = meta["feature_columns"]
        self.categorical_ = meta["categorical"]
        self.best_iteration_ = meta.get("best_iteration")
        model_file = d / meta.get("model_file", MODEL_FILES[self.backend])
        if self.backend == "lightgbm":
            import lightgbm as lgb

            self.model_ = lgb.Booster(model_file=str(model_file))
            self.model_.best_iteration = 0  # the saved file holds exactly the rounds to use
        elif self.backend == "logreg":
            self.model_ = LinearModel(json.loads(model_file.read_text()))
        else:
            import xgboost as xgb

            self.model_ = xgb.Booster()
            self.model_.load_model(str(model_file))
            self.model_.set_param({"nthread": n_jobs})
        return self
