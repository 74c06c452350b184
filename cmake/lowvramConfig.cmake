# CMake package configuration of lowvram, installed by scripts/install.sh as <prefix>/lib/cmake/lowvram/.
#
#   find_package(lowvram 0.1 REQUIRED)        # CMAKE_PREFIX_PATH or lowvram_DIR points at the install prefix
#   target_link_libraries(app PRIVATE lowvram::lowvram)
#
# lowvram::lowvram is an IMPORTED shared library: it carries the include directory (lowvram.h, and the header-only
# C++17 wrapper lowvram.hpp) so linking it is all a consumer does. The file is relocatable: paths are found from
# its own location, so the prefix may be moved or packaged as a whole.

get_filename_component(_lowvram_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)

if(NOT TARGET lowvram::lowvram)
    set(_lowvram_lib "${_lowvram_prefix}/lib/liblowvram.so")
    set(_lowvram_include "${_lowvram_prefix}/include")
    foreach(_lowvram_path IN ITEMS "${_lowvram_lib}" "${_lowvram_include}/lowvram.h")
        if(NOT EXISTS "${_lowvram_path}")
            set(${CMAKE_FIND_PACKAGE_NAME}_FOUND FALSE)
            set(${CMAKE_FIND_PACKAGE_NAME}_NOT_FOUND_MESSAGE
                "lowvram's package at ${_lowvram_prefix} is incomplete: ${_lowvram_path} is missing")
            return()
        endif()
    endforeach()
    add_library(lowvram::lowvram SHARED IMPORTED)
    set_target_properties(lowvram::lowvram PROPERTIES
        IMPORTED_LOCATION "${_lowvram_lib}"
        IMPORTED_NO_SONAME TRUE # the Rust cdylib has no DT_SONAME: link it by path, not by a missing soname
        INTERFACE_INCLUDE_DIRECTORIES "${_lowvram_include}")
    unset(_lowvram_lib)
    unset(_lowvram_include)
    unset(_lowvram_path)
endif()

set(lowvram_INCLUDE_DIRS "${_lowvram_prefix}/include")
set(lowvram_LIBRARIES lowvram::lowvram)
unset(_lowvram_prefix)
