"""The dataflow graph of derived quantities (what the kernel planner reads)."""
import networkx as nx
import pytest

from designmodel import zoo
from designmodel.derive import derive


@pytest.mark.parametrize("name", zoo.NAMES)
def test_dataflow_is_a_dag_ending_in_the_readout(name):
    g = derive(name).dataflow
    assert nx.is_directed_acyclic_graph(g)
    assert "y_t" in g and g.out_degree("y_t") == 0
    assert nx.has_path(g, "S_{t-1}", "y_t") and nx.has_path(g, "k_t", "y_t")


@pytest.mark.parametrize("name", zoo.NAMES)
def test_covariance_reaches_the_mean_only_in_the_kalman_family(name):
    d = derive(name)
    g = d.dataflow
    reaches = "P_{t-1}" in g and nx.has_path(g, "P_{t-1}", "S_t")
    assert reaches == (d.family == "kalman")


def test_kalman_gain_flows_through_the_innovation_variance():
    g = derive("bayesian_layer").dataflow
    assert nx.has_path(g, "r", "s_t") and nx.has_path(g, "s_t", "S_t")
    assert nx.has_path(g, "\\bar{P}_t", "u_t") and g.has_edge("u_t", "P_t")
    assert g.has_edge("g", "\\bar{S}_t") and g.has_edge("sigma", "\\bar{P}_t")


def test_reset_gain_depends_on_its_inputs_only():
    g = derive("gated_deltanet").dataflow
    assert set(g.predecessors("\\beta_t")) == {"beta"}
