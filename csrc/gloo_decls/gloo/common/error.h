// Not needed by ProcessGroupGloo.hpp's declarations (see README.md).
#pragma once
