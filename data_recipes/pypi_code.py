"""A reproducible code corpus from pinned source distributions on PyPI (pretrain_gpu_1b's corpus).

Each sdist in PINS (name, version, sha256) is downloaded from the package index (PyPI, or the index in
PIP_INDEX_URL): the project's simple index page (PEP 503) is read for the file whose sha256 is the pinned one, and
the download is checked against it, so a changed file is refused. pip itself is not used: `pip download` of an
sdist runs the project's build backend to read its metadata, which for meson, CMake and Rust projects (numpy,
scipy, opencv, polars, ...) means compiling them.

Source files are kept when their extension is in CODE_EXTENSIONS, they are UTF-8, at most MAX_FILE_BYTES, and look
hand-written (no line over MAX_LINE_CHARS, mean line length at most MAX_MEAN_LINE_CHARS: the line-length filter
of the Codex training set, which drops minified JavaScript and data tables). They are read in archive order (fixed by the pinned hash) and
deduplicated by content across all packages (the first copy in package-name order is kept: vendored modules
appear once), one JSONL shard per package (`corpus/<name>.jsonl`, records {"text", "path"}). The token store is
built from those shards and held out by package (whole packages, in hash order, none larger than a quarter of the
held-out share, until HELDOUT_FRACTION of the bytes). Downloads and extraction are cached in CACHE (the extracted
corpus is named by the digest of the pins and the selection rule, which the manifest records, so a changed list
is rebuilt); once a corpus is extracted its sdists may be deleted.

The list below holds 142 sdists, chosen for hand-written code (packages whose files are mostly generated, such as
Cython output, SIP bindings or generated SDKs, were left out): 1.64 GB of kept code.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile

from data_recipes.common import (
  build_options,
  build_text_dataset,
  file_sha256,
  is_current,
  publish_folder,
  staging_folder,
  text_build_settings,
)
from data_recipes.python_packages import heldout_units
from diffgemma_jax.data.build import Corpus
from diffgemma_jax.data.manifest import read_manifest
from diffgemma_jax.errors import DataError

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "diffgemma_jax", "pypi_code")
INDEX_URL = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple/")
FETCH_THREADS = 8
HELDOUT_FRACTION = 0.02
MAX_FILE_BYTES = 1 << 20
MAX_LINE_CHARS = 1000
MAX_MEAN_LINE_CHARS = 100
CODE_EXTENSIONS = (".py", ".pyi", ".pyx", ".pxd", ".c", ".h", ".cc", ".cpp", ".hpp", ".cxx", ".rs", ".go", ".js",
                   ".ts", ".java", ".f", ".f90", ".sh", ".md", ".rst")
# (name, version, sha256 of the sdist as PyPI serves it); the comment: MB of code kept from it (after the files of
# the packages before it in name order).
PINS = (
  ("abjad", "3.19", "23db7739150a14594c7d726c0335e10b39750786bdfd9366bd25f6fd1e384cfb"),  # 3.1 MB
  ("accelerate", "1.2.1", "03e161fc69d495daf2b9b5c8d5b43d06e2145520c04727b5bda56d49f1a43ab5"),  # 1.6 MB
  ("aiohttp", "3.11.11", "bb49c7f1e6ebf3821a42d81d494f538107610c3a705987f53068546b0e90303e"),  # 4.2 MB
  ("ansible", "11.1.0", "d01b425990d960d2a33fc378e1b73dbca1c0e28bc22f4056ab6b3c8e9ae74fba"),  # 210.9 MB
  ("ansible-core", "2.18.1", "14cac1f92bbdae881cb0616eddeb17925e8cb507e486087975e724533d9de74f"),  # 9.2 MB
  ("apache-airflow", "2.10.4", "10ebf8b95c59ba229f06235665e92cc684577861cfd1e96bdbe3d3eb7cb5779a"),  # 5.4 MB
  ("ase", "3.24.0", "9acc93d6daaf48cd27b844c56f8bf49428b9db0542faa3cc30d9d5b8e1842195"),  # 7.3 MB
  ("astropy", "7.0.0", "e92d7c9fee86eb3df8714e5dd41bbf9f163d343e1a183d95bf6bd09e4313c940"),  # 21.0 MB
  ("asyncssh", "2.19.0", "723dead4d068b558708dc66a4ca7e7a93a813aa9416036eccb9af4c03ae2cf30"),  # 2.9 MB
  ("biopython", "1.84", "60fbe6f996e8a6866a42698c17e552127d99a9aab3259d6249fbaabd0e0cc7b4"),  # 15.2 MB
  ("biotite", "1.1.0", "4bad8798e763a6a8a0f8823d26a6027154f3ac26f5b179cea744efb67c9be5ab"),  # 2.1 MB
  ("black", "24.10.0", "846ea64c97afe3bc677b761787993be4991810ecc7a4a937816dd6bddedc4875"),  # 1.5 MB
  ("bokeh", "3.6.2", "2f3043d9ecb3d5dc2e8c0ebf8ad55727617188d4e534f3e7208b36357e352396"),  # 4.7 MB
  ("buildbot", "4.2.0", "b52877776de44e8059d4e21142900ab9b5802125dc71ce8db6a9ffaa93a94128"),  # 4.8 MB
  ("casadi", "3.6.7", "21cde87288afebb32a2a035bf6b6a91a025e24ee14aba7a0ae5515707b9887c1"),  # 12.4 MB
  ("celery", "5.4.0", "504a19140e8d3029d5acad88330c541d4c3f64c789d85f94756762d8bca7e706"),  # 4.3 MB
  ("cffi", "1.17.1", "1c39c6016c32bc48dd54561950ebd6836e1670f2ae46128f67cf49e789c52824"),  # 2.1 MB
  ("cryptography", "44.0.0", "cd4e834f340b4293430701e772ec543b0fbe6c2dea510a5286fe0acabe153a02"),  # 3.9 MB
  ("cupy", "13.3.0", "9a2a17af2b99cce91dd1366939c3805e3f51f9de5046df64f29ccbad3bdf78ed"),  # 17.8 MB
  ("cvxpy", "1.6.0", "679a9531877dfe0e2defabe106bc62a3e7ea094a7fcfcb797e121127ff8ff39a"),  # 7.7 MB
  ("Cython", "3.0.11", "7146dd2af8682b4ca61331851e6aebce9fe5158e75300343f80c07ca80b1faff"),  # 9.7 MB
  ("dagster", "1.9.6", "72271c6681e441cbd519aca34c57ee33acaae8168b8c08a857569db834627f28"),  # 7.0 MB
  ("dask", "2024.12.1", "bac809af21c2dd7eb06827bccbfc612504f3ee6435580e548af912828f823195"),  # 6.2 MB
  ("datasets", "3.2.0", "9a6e1a356052866b5dbdd9c9eedb000bf3fc43d986e3584d9b028f4976937229"),  # 2.3 MB
  ("dbt-core", "1.9.1", "38c931dd5206fdb11a9db1decf1075ce891ad9f4692bd00a9ba760a6cfe4358d"),  # 1.7 MB
  ("deepchem", "2.8.0", "ba3f0cf3b589a33dd70757b1045600f52bb539bcd2b6fed9058cb76c7e9d4538"),  # 4.2 MB
  ("deepspeed", "0.16.2", "a5b45fdefae65ab48aa30873d3c4d6ec85993eee232aa3a088087c9b88b22281"),  # 5.3 MB
  ("diffusers", "0.32.1", "d48c19a4bce612d225f857e2e5d4f6ee003b88234af46b44c20119ee23f1568c"),  # 13.9 MB
  ("dipy", "1.10.0", "b9c8559c1ceec118bd8ebafa1c654582fc13d64c66266ca4d15a2df2367be870"),  # 6.2 MB
  ("distributed", "2024.12.1", "438aa3ae48bfac9c2bb2ad03f9d47899286f9cb3db8a627b3b8c0de9e26f53dd"),  # 2.9 MB
  ("django", "5.1.4", "de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a"),  # 18.0 MB
  ("docutils", "0.21.2", "3a6b18732edf182daa3cd12775bbb338cf5691468f91eeeb109deff6ebfa986f"),  # 3.0 MB
  ("duckdb", "1.1.3", "68c3a46ab08836fe041d15dcbf838f74a990d551db47cb24ab1c4576fc19351c"),  # 45.8 MB
  ("dulwich", "0.22.7", "d53935832dd182d4c1415042187093efcee988af5cd397fb1f394f5bb27f0707"),  # 1.8 MB
  ("espnet", "202412", "f41824db99475ba038bea68f0d8986dd144b59af6721c58f4caf92cdc725af6c"),  # 7.9 MB
  ("fairseq", "0.12.2", "34f1b18426bf3844714534162f065ab733e049597476daa35fffb4d06a92b524"),  # 6.1 MB
  ("fastapi", "0.115.6", "9ec46f7addc14ea472958a96aae5b5de65f39721a46aaf5705c480d9a8b76654"),  # 3.9 MB
  ("flask", "3.1.0", "5f873c5184c897c8d9d1b05df1e3d01b14910ce69607a117bd3277098a5836ac"),  # 1.1 MB
  ("flax", "0.10.2", "6f831350026ad48182ba6588bb4dd72dc1084985d9aca923254cb3e4c78d75f3"),  # 3.8 MB
  ("fonttools", "4.55.3", "3983313c2a04d6cc1fe9251f8fc647754cf49a61dac6cb1e7249ae67afaafc45"),  # 6.9 MB
  ("geopandas", "1.0.1", "b8bf70a5534588205b7a56646e2082fb1de9a03599651b3d80c99ea4c2ca08ab"),  # 1.6 MB
  ("gymnasium", "1.0.0", "9d2b66f30c1b34fe3c2ce7fae65ecf365d0e9982d2b3d860235e773328a3b403"),  # 1.3 MB
  ("h5py", "3.12.1", "326d70b53d31baa61f00b8aa5f95c2fcb9621a3ee8365d770c551a13dbbcbfdf"),  # 1.4 MB
  ("homeassistant", "2024.12.5", "3df79d8a02561cbbf606a1ce81579d0f2271c714a67477b60af3cd6025a2e9a0"),  # 37.2 MB
  ("hypothesis", "6.123.2", "02c25552783764146b191c69eef69d8375827b58a75074055705ab8fdbc95fc5"),  # 1.5 MB
  ("ipython", "8.31.0", "b6a2274606bec6166405ff05e54932ed6e5cfecaca1fc05f2cacde7bb074d70b"),  # 3.6 MB
  ("jax", "0.4.38", "43bae65881628319e0a2148e8f81a202fbc2b8d048e35c7cb1df2416672fa4a8"),  # 8.2 MB
  ("jedi", "0.19.2", "4770dc3de41bde3966b02eb84fbcf557fb33cce26ad23da12c742fb50ecb11f0"),  # 4.8 MB
  ("jupyter-server", "2.15.0", "9d446b8697b4f7337a1b7cdcac40778babdd93ba614b6d68ab1c0c918f1c4084"),  # 1.3 MB
  ("kivy", "2.3.1", "0833949e3502cdb4abcf9c1da4384674045ad7d85644313aa1ee7573f3b4f9d9"),  # 5.6 MB
  ("librosa", "0.10.2.post1", "cd99f16717cbcd1e0983e37308d1db46a6f7dfc2e396e5a9e61e6821e44bd2e7"),  # 1.4 MB
  ("llama_cpp_python", "0.3.5", "f5ce47499d53d3973e28ca5bdaf2dfe820163fa3fb67e3050f98e2e9b58d2cf6"),  # 11.8 MB
  ("luigi", "3.6.0", "41b14850223c619d9006b30acda733e756b883fc7e60814205576647190c96e3"),  # 2.0 MB
  ("matplotlib", "3.10.0", "b886d02a581b96704c9d1ffe55709e49b4d2d52709ccebc4be42db856e511278"),  # 15.5 MB
  ("matrix-synapse", "1.121.1", "10e0ef4d328d110fd8bdba4a80933abde5a5a4af8d1d5d710aee4825958c7e81"),  # 16.0 MB
  ("mercurial", "6.9", "629604293df2be8171ec856bf4f8b4faa8e4305af13607dce0f89f74132836d6"),  # 13.8 MB
  ("meson", "1.6.1", "1eca49eb6c26d58bbee67fd3337d8ef557c0804e30a6d16bfdf269db997464de"),  # 4.9 MB
  ("mne", "1.9.0", "101967698b005a7f9071586e0469aebc83fe06f48717a95f3382a6f99c591162"),  # 7.0 MB
  ("moto", "5.0.25", "deea8b158cec5a65c9635ae1fff4579d735b11ac8a0e5226fbbeb742ce0ce6b2"),  # 19.3 MB
  ("music21", "9.3.0", "0cf4c67da2062ec164037280580d51ed06b58e84f78afc8d00f088c2bff74f4a"),  # 11.1 MB
  ("mypy", "1.14.1", "7ec88144fe9b510e8475ec2f5f251992690fcf89ccb4500b214b4226abcd32d6"),  # 10.6 MB
  ("napari", "0.5.5", "8c634957f98cce20352405b1c50e9e17ad7633b87d4808fc18740060c18d3a66"),  # 5.0 MB
  ("nemo-toolkit", "2.0.0", "8ebd89e152890832be63eef86a940755fbd8a3e8256ca1bbbf5bbcd120c2bb7d"),  # 15.8 MB
  ("networkx", "3.4.2", "307c3669428c5362aab27c8a1260aa8f47c4e91d3891f48be0141738d8d053e1"),  # 6.9 MB
  ("nibabel", "5.3.2", "0bdca6503b1c784b446c745a4542367de7756cfba0d72143b91f9ffb78be569b"),  # 3.0 MB
  ("nilearn", "0.11.1", "a01df08fc6c8ded3cd6fb7a211634603ad46a6df780504b6d05222c2e7a972fe"),  # 4.9 MB
  ("nltk", "3.9.1", "87d127bd3de4bd89a4f81265e5fa59cb1b199b27440175370f7417d2bc7ae868"),  # 5.0 MB
  ("Nuitka", "2.5.9", "6cfb37449c9dd60bf6e9f79e420198019f44bb5154e3d6a40d3124d5cc26edf1"),  # 21.9 MB
  ("numba", "0.60.0", "5df6158e5584eece5fc83294b949fd30b9f1125df7708862205217e068aabf16"),  # 12.5 MB
  ("numpy", "2.2.1", "45681fd7128c8ad1c379f0ca0776a8b0c6583d2f69889ddac01559dfe4390918"),  # 37.4 MB
  ("opencv-python", "4.10.0.84", "72d234e4582e9658ffea8e9cae5b63d488ad06994ef12d81dc303b17472f3526"),  # 72.4 MB
  ("pandas", "2.2.3", "4f18ba62b61d7e192368b84517265a99b4d7ee8912f8708660fb4a366cc82667"),  # 22.2 MB
  ("paramiko", "3.5.0", "ad11e540da4f55cedda52931f1a3f812a8238a7af7f62a60de538cd80bb28124"),  # 1.1 MB
  ("peft", "0.14.0", "546d69af7b42f5ef715a3d3261ed818bc917ae6055e5d7e187ed3f2c76ad72dc"),  # 2.3 MB
  ("Pillow", "11.0.0", "72bacbaf24ac003fea9bff9837d1eedb6088758d41e100c1552930151f677739"),  # 4.4 MB
  ("pip", "24.3.1", "ebcb60557f2aefabc2e0f918751cd24ea0d56d8ec5445fe1807f1d2109660b99"),  # 5.1 MB
  ("polars", "1.18.0", "5c2f119555ae8d822a5322509c6abd91601a8931115d2e4c3fff13fadf39e877"),  # 18.5 MB
  ("praat-parselmouth", "0.4.5", "c6393ddede06ce81a8b178ce9aa1c0fc7fd98af68a650cadd22c953fed6e4745"),  # 37.8 MB
  ("prefect", "3.1.10", "aefabf2b6894b6336a4b4ed516da950a511eb13a51733132d674fc3820562f28"),  # 5.6 MB
  ("pyarrow", "18.1.0", "9386d3ca9c145b5539a1cfc75df07757dff870168c959b473a0bccbc3abc8c73"),  # 4.2 MB
  ("pybullet", "3.2.6", "da27525433c88698dc9fd8bc20fa4ae4d07738b4656633659ebd82c2d2884e08"),  # 20.9 MB
  ("pygame", "2.6.1", "56fb02ead529cee00d415c3e007f75e0780c655909aaa8e8bf616ee09c9feb1f"),  # 8.8 MB
  ("pyglet", "2.0.20", "702ea52b1fc1b6447904d2edd579212b29f1b3475e098ac49b57647a064accb7"),  # 5.6 MB
  ("pygments", "2.18.0", "786ff802f32e91311bff3889f6e9a86e81505fe99f2735bb6d60ae0c5004f199"),  # 4.8 MB
  ("pyinstaller", "6.11.1", "491dfb4d9d5d1d9650d9507daec1ff6829527a254d8e396badd60a0affcb72ef"),  # 3.9 MB
  ("pylint", "3.3.3", "07c607523b17e6d16e2ae0d7ef59602e332caa762af64203c24b41c27139f36a"),  # 4.4 MB
  ("pymatgen", "2024.11.13", "82637a8da316cb76024c9b2541e12644971a3bd388f502040738a97b73a54378"),  # 7.3 MB
  ("pymc", "5.19.1", "107c83f03bde6dd784347097b6b82441c2dd81ae1805d02c8304999a5bf11438"),  # 2.0 MB
  ("pyo", "1.0.5", "e042d947a0b641b400e228f9e21eeca21df8bf4895c6dbd013f87638d7728e31"),  # 6.2 MB
  ("pyomo", "6.8.2", "40d8f7b216ad1602bb254f4296591608dd94fe2c961dc1e63ca6b84fb397bed6"),  # 17.6 MB
  ("pyqt5", "5.15.11", "fda45743ebb4a27b4b1a51c6d8ef455c4c1b5d610c90d2934c7802b5c1557c52"),  # 7.2 MB
  ("pyro-ppl", "1.9.1", "5e1596de276c038a3f77d2580a90d0a97126e0104900444a088eee620bb0d65e"),  # 2.5 MB
  ("pyscf", "2.7.0", "ca8efc2f28d72c3130f26a967e7fa8d0bbc4a6b47d16a7c4c732ec85a31b7eec"),  # 11.7 MB
  ("pytensor", "2.26.4", "d88fee65196fd53a090f98a050ffadc651d9acbcb2207b36001ba61ac18c3626"),  # 5.4 MB
  ("pytest", "8.3.4", "965370d062bce11e73868e0335abac31b4d3de0e82f4007408d242b4f8610761"),  # 5.4 MB
  ("pythainlp", "5.0.5", "315a38929c74f878960887472d0d242b25fc45c41d32aa5c89a115372e663bd3"),  # 1.0 MB
  ("pyvista", "0.44.2", "db65943c3c1c9ba49fe16f5a25a5bc23b74bf1ea7a38aae4ef9c4dc5838ccf5e"),  # 3.5 MB
  ("qiskit", "1.3.1", "7c9b34d700175db6615c9ab150b86f6f06ff7b74540e50bdf2ec7dc904639385"),  # 16.4 MB
  ("reportlab", "4.2.5", "5cf35b8fd609b68080ac7bbb0ae1e376104f7d5f7b2d3914c7adc63f2593941f"),  # 4.4 MB
  ("roundup", "2.4.0", "0f4e0f3287e877a38a531c7668308472b85cdc9665b25ba2b90daaf16848b778"),  # 3.5 MB
  ("ruff", "0.8.4", "0d5f89f254836799af1615798caa5f80b7f935d7a670fad66c5007928e57ace8"),  # 12.7 MB
  ("sagemath-standard", "10.5", "fa0e91cc12754db3cbdf843dbe30252b4378c030825530bc6858ddbcac701096"),  # 95.9 MB
  ("salt", "3007.1", "b933ac4cb3e4b1118b46dada55c9cc6bdc6f0f94b4c92877aec44b25c6a28c9a"),  # 50.0 MB
  ("scanpy", "1.10.4", "2682fbbe2e4106c349472feebef08e174062fb666db4c94123758c6a7a470396"),  # 1.8 MB
  ("scapy", "2.6.1", "7600d7e2383c853e5c3a6e05d37e17643beebf2b3e10d7914dffcc3bc3c6e6c5"),  # 8.5 MB
  ("scikit-image", "0.25.0", "58d94fea11b6b3306b3770417dc1cbca7fa9bcbd6a13945d7910399c88c2018c"),  # 5.3 MB
  ("scikit-learn", "1.6.0", "9d58481f9f7499dff4196927aedd4285a0baec8caa3790efbe205f13de37dd6e"),  # 17.3 MB
  ("scipy", "1.14.1", "5a275584e726026a5699459aa72f828a610821006228e841b94275c4a7c08417"),  # 61.6 MB
  ("SCons", "4.8.1", "5b641357904d2f56f7bfdbb37e165ab996b6143c948b9df0efc7305f54949daa"),  # 2.7 MB
  ("sentencepiece", "0.2.0", "a52c19171daaf2e697dc6cbe67684e0fa341b1248966f6aebb541de654d15843"),  # 3.1 MB
  ("setuptools", "75.6.0", "8199222558df7c86216af4f84c30e9b34a61d8ba19366cc914424cdbd28252f6"),  # 4.3 MB
  ("shapely", "2.0.6", "997f6159b1484059ec239cacaa53467fd8b5564dabe186cd84ac2944663b0bf6"),  # 1.2 MB
  ("SimpleITK", "2.3.0", "fb28601b31600e0027b566cfb4b98e0d9e6ff05920fbb338142aafb7c0932a08"),  # 2.5 MB
  ("spacy", "3.8.3", "81a967dc3d6a5a0a9ab250559483fe2092306582a9192f98be7a63bdce2797f7"),  # 4.9 MB
  ("speechbrain", "1.0.2", "b293d665161d7cd34caa3ee8966acce6c43b611b7fc9cd0b24637ce871bd7a73"),  # 7.2 MB
  ("Sphinx", "8.1.3", "43c1911eecb0d3e161ad78611bc905d1ad0e523e4ddc202a58a821773dc4c927"),  # 6.5 MB
  ("SQLAlchemy", "2.0.36", "7f2767680b6d2398aea7082e45a774b2b0767b5c8d8ffb9c8b683088ea9b29c5"),  # 24.1 MB
  ("sqlglot", "26.0.1", "588cde7739029fda310fb7dd49afdc0a20b79e760e4cd6d5e1cd083e7e458b90"),  # 3.2 MB
  ("stanza", "1.10.1", "f1b283021323ef9273fb1a751a194c0d568e373a2a11b933e2f4b600322406b2"),  # 3.6 MB
  ("statsmodels", "0.14.4", "5d69e0f39060dc72c067f9bb6e8033b6dccdb0bae101d76a7ef0bcc94e898b67"),  # 18.0 MB
  ("sunpy", "6.0.4", "aaae63e394b7fe13101e359c3a482becedd8b99a7b4a393f03a01244154fc5f4"),  # 3.6 MB
  ("sympy", "1.13.3", "b27fd2c6530e0ab39e275fc9b683895367e51d5da91baa8d3d64db2565fec4d9"),  # 26.7 MB
  ("synapse", "2.192.0", "360a6cc132c6177511577be3bc9761843b3974cb4a1e1235412025939e37170d"),  # 8.6 MB
  ("tables", "3.10.1", "4aa07ac734b9c037baeaf44aec64ec902ad247f57811b59f30c4e31d31f126cf"),  # 8.8 MB
  ("tensorflow-datasets", "4.9.7", "948d7a68ee693d9709cbfe955f97344b98647e5512e0e42dd2a61f3e7925d68b"),  # 6.2 MB
  ("tokenizers", "0.21.0", "ee0894bf311b75b0c03079f33859ae4b2334d675d4e93f5a4132e1eae2834fe4"),  # 1.5 MB
  ("tornado", "6.4.2", "92bad5b4746e9879fd7bf1eb21dce4e3fc5128d71601f80005afa39237ad620b"),  # 1.9 MB
  ("trac", "1.6", "61d73c61f670d68ffc346829d24b2f1d2050aa561aa71cb98e2fb43992c27304"),  # 4.8 MB
  ("transformers", "4.47.1", "6c29c05a5f595e278481166539202bf8641281536df1c42357ee58a45d0a564a"),  # 45.2 MB
  ("trimesh", "4.5.3", "b1af60399f64f4715d744c5195754068bfeb98981b92feb0c15d016c99379f87"),  # 2.3 MB
  ("trl", "0.13.0", "ad3259098457b92a94f95de6da4138807c846919beacccf22d26ac238987b50b"),  # 1.5 MB
  ("trytond", "7.4.2", "e138430ec02fcbff4c7756db3896ad219633ae1650b0c3f885b87ff4c054c600"),  # 2.7 MB
  ("Twisted", "24.11.0", "695d0556d5ec579dcc464d2856b634880ed1319f45b10d19043f2b57eb0115b5"),  # 14.0 MB
  ("uv", "0.5.13", "58a66786f2e95c89539bafd819cf2959f56199457301eac8faa920c1872c4f36"),  # 9.9 MB
  ("uvloop", "0.21.0", "3bf12b0fda68447806a7ad847bfa591613177275d35b6724b1ee573faa3704e3"),  # 4.1 MB
  ("vispy", "0.14.3", "efbbb847a908baf7e7169ab9bf296138a39364f367e6cb0a8ec03ad71699d31d"),  # 3.5 MB
  ("vllm", "0.6.6.post1", "d9035954a2028fd7efb2c37e137d69b568d80f193b6a8748f885676292a43a95"),  # 10.7 MB
  ("wagtail", "6.3.1", "93876cc7a3bfcfff4c0393949562cbf249f244c4ca653d58a2dbab737f455715"),  # 8.2 MB
  ("werkzeug", "3.1.3", "60723ce945c19328679790e3282cc758aa4a6040e4bb330f53d30fa546d44746"),  # 1.4 MB
  ("xarray", "2024.11.0", "1ccace44573ddb862e210ad3ec204210654d2c750bec11bbe7d842dfc298591f"),  # 7.2 MB
  ("z3-solver", "4.13.4.0", "66944689398d19f831f94524e95e99961d998afa27cfef1918a5a441029ea73f"),  # 24.1 MB
  ("zope.interface", "7.2", "8b49f1a3d1ee4cdaf5b32d2e738362c7f5e40ac8b46dd7d1a65e82a4872728fe"),  # 1.1 MB
)


def pins_digest(pins=PINS) -> str:
  """Names the extracted corpus: the pins and the rule that selects their files."""
  rule = [CODE_EXTENSIONS, MAX_FILE_BYTES, MAX_LINE_CHARS, MAX_MEAN_LINE_CHARS]
  return hashlib.sha256(json.dumps([pins, rule]).encode()).hexdigest()[:16]


def _sdist_link(index_url: str, name: str, version: str, sha256: str) -> tuple[str, str]:
  """(url, file name) of the file of project `name` whose sha256 is `sha256`, from its simple index page."""
  page = urllib.parse.urljoin(index_url.rstrip("/") + "/", re.sub(r"[-_.]+", "-", name).lower() + "/")
  with urllib.request.urlopen(page, timeout=60) as response:
    html = response.read().decode("utf-8", "replace")
  for href in re.findall(r'href="([^"]+)"', html):
    url, _, fragment = href.replace("&amp;", "&").partition("#")
    if fragment == f"sha256={sha256}":
      return urllib.parse.urljoin(page, url), urllib.parse.unquote(url.rsplit("/", 1)[-1])
  raise DataError(f"{page} lists no file with the sha256 pinned for {name}=={version} ({sha256})")


def _download(url: str, path: str, sha256: str) -> None:
  """`url` to `path`, refused unless its sha256 is `sha256`."""
  digest = hashlib.sha256()
  with urllib.request.urlopen(url, timeout=300) as response, open(path + ".partial", "wb") as out:
    while chunk := response.read(1 << 20):
      digest.update(chunk)
      out.write(chunk)
  if digest.hexdigest() != sha256:
    os.remove(path + ".partial")
    raise DataError(f"{url} has sha256 {digest.hexdigest()}, not the pinned {sha256}")
  os.replace(path + ".partial", path)


def fetch(pins=PINS, cache: str = CACHE, index_url: str = INDEX_URL) -> dict[str, str]:
  """{name: sdist path}: each pinned sdist, downloaded (hash-checked) into the cache once, as
  `sdists/<sha256[:16]>-<file name>`."""
  directory = os.path.join(cache, "sdists")
  os.makedirs(directory, exist_ok=True)
  cached = {entry.split("-", 1)[0]: os.path.join(directory, entry) for entry in os.listdir(directory)
            if not entry.endswith(".partial")}

  def one(pin):
    name, version, sha256 = pin
    path = cached.get(sha256[:16])
    if path and file_sha256(path) == sha256:
      return path
    try:
      url, filename = _sdist_link(index_url, name, version, sha256)
      path = os.path.join(directory, f"{sha256[:16]}-{filename}")
      _download(url, path, sha256)
    except (urllib.error.URLError, OSError) as e:
      raise DataError(f"could not fetch {name}=={version} from {index_url}: {e}") from None
    return path

  with concurrent.futures.ThreadPoolExecutor(FETCH_THREADS) as pool:
    futures = {pin[0]: pool.submit(one, pin) for pin in pins}
    errors = [f.exception() for f in futures.values() if f.exception()]
    if errors:
      more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
      raise DataError(f"{errors[0]}{more}")
    return {name: future.result() for name, future in futures.items()}


def _members(archive: str):
  """(path inside the package, bytes) of an sdist's files that may be kept (extension, size), in archive order
  (a gzip stream read in another order is decompressed again from its start for each step back)."""
  def wanted(path, size):
    return size <= MAX_FILE_BYTES and path.lower().endswith(CODE_EXTENSIONS)

  if zipfile.is_zipfile(archive):
    with zipfile.ZipFile(archive) as z:
      for info in z.infolist():
        if not info.is_dir() and wanted(info.filename, info.file_size):
          yield info.filename.split("/", 1)[-1], z.read(info)
    return
  with tarfile.open(archive, "r|*") as tar:
    for member in tar:
      if member.isfile() and wanted(member.name, member.size):
        yield member.name.split("/", 1)[-1], tar.extractfile(member).read()


def looks_hand_written(text: str) -> bool:
  lines = text.split("\n")
  return (max(len(line) for line in lines) <= MAX_LINE_CHARS
          and len(text) <= MAX_MEAN_LINE_CHARS * len(lines))


def extract(sdists: dict[str, str], cache: str = CACHE, pins=PINS) -> Corpus:
  """The deduplicated source files of every sdist, one JSONL shard per package (written once per pin list)."""
  root = os.path.join(cache, f"corpus-{pins_digest(pins)}")
  if not os.path.isfile(os.path.join(root, "files.json")):
    staging = staging_folder(root)
    seen, sizes = set(), {}
    for name in sorted(sdists, key=str.lower):
      shard = f"{name.lower()}.jsonl"
      sizes[shard] = 0
      with open(os.path.join(staging, shard), "w", encoding="utf-8") as out:
        for path, data in _members(sdists[name]):
          digest = hashlib.sha256(data).digest()
          if digest in seen:
            continue
          try:
            text = data.decode("utf-8")
          except UnicodeDecodeError:
            continue
          if not looks_hand_written(text):
            continue
          seen.add(digest)
          out.write(json.dumps({"text": text, "path": f"{name}/{path}"}, ensure_ascii=False) + "\n")
          sizes[shard] += len(data)
    with open(os.path.join(staging, "files.json"), "w") as f:
      json.dump({"files": list(sizes), "bytes": sizes}, f)
    publish_folder(staging, root, "files.json")
  return extracted_corpus(root)


def extracted_corpus(root: str) -> Corpus:
  """The corpus of an extracted pin list; its held-out packages are chosen from their sizes."""
  with open(os.path.join(root, "files.json")) as f:
    listing = json.load(f)
  return Corpus(root=root, files=tuple(listing["files"]), name=f"the pinned PyPI sdists in {root!r}",
                split_by="file", heldout_fraction=HELDOUT_FRACTION,
                heldout_keys=tuple(heldout_units(listing["bytes"], HELDOUT_FRACTION)))


def corpus(pins=PINS, cache: str = CACHE) -> Corpus:
  """The extracted corpus of `pins`, fetching and extracting only what the cache lacks."""
  root = os.path.join(cache, f"corpus-{pins_digest(pins)}")
  if os.path.isfile(os.path.join(root, "files.json")):
    return extracted_corpus(root)
  return extract(fetch(pins, cache), cache, pins)


def build(output_dir: str, vocab_size: int = 32768, source: str | None = None, tokenizer: str | None = None,
          **options) -> dict:
  del source
  notes = {"pins": pins_digest(), "packages": len(PINS)}
  settings = Corpus(root="", files=(), name="", split_by="file", heldout_fraction=HELDOUT_FRACTION)
  expect = {**notes, **text_build_settings(settings, tokenizer, options)}
  if is_current(output_dir, "pypi_code", vocab_size, None, tokenizer, expect=expect):
    return read_manifest(output_dir)  # no download
  return build_text_dataset(output_dir, "pypi_code", corpus(), vocab_size, notes=notes, tokenizer=tokenizer,
                            **build_options(options))


def main(argv=None) -> int:
  from data_recipes import run_cli
  return run_cli(build, "pypi_code", argv)


if __name__ == "__main__":
  sys.exit(main())
